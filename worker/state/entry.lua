-- The scripts' half of worker/state/entry.py: an entry's first byte is its label, 49 ('1') a click.
local function is_click(entry)
  return string.byte(entry, 1) == 49
end
