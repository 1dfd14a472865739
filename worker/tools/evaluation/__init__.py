"""The evaluation on real data (`python -m worker eval`), offline or live.

- `plan`: the plans, the slice of the data set both evaluations replay, and their checkpoints;
  `metrics`: AUC / log loss per segment and their means.
- Offline: `simulation` (the worker replayed in one process), `offline` (the four procedures),
  `report` (the JSON result and the table), `plot`, `progress`, `offline_command`.
- Live: `live` (the run), `live_fleet` (the worker processes), `live_scorer` (score requests through
  Kafka), `live_command` (its output and plot).
- `options` and `cli`: the command's options, and the choice between the two.
"""
