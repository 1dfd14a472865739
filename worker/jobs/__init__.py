"""The compute thread's jobs, each in the one module that owns its order of steps: a segment's training
(`segment_job`), the group's shared run (`shared_job`), score requests and refreshed scores (`scoring`),
the registry's outboxes (`outboxes`) and the periodic checks that call them (`housekeeping`).
`worker.app.Worker` builds them and runs them on its compute thread."""
