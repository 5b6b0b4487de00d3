"""Merging: the elementwise rules that combine task tensors (`rules`: task arithmetic,
magnitude pruning, TIES, DARE), shared by adapter combination (`lowrax.combine_adapters`)
and full-model merging (`models`)."""
