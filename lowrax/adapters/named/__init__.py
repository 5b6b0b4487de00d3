"""Named adapters on one base (PEFT's `adapter_name`), held in `lowrax.adapters.slots`'
slot tables: the functions that load, pick, delete and extract them (`named`), their
weighted combination (`combine`, PEFT's `add_weighted_adapter`) and `load_peft` / `save_peft`
with `adapter_name=` (`exchange`)."""
