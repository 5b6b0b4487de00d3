"""Named adapters on one base (PEFT's `adapter_name`): a slot table per adapted kernel
(`slots`), the functions that load, pick, delete and extract them (`named`), and their
weighted combination (`combine`, PEFT's `add_weighted_adapter`)."""
