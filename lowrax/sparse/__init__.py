"""The sparse base a pruned model keeps: a kernel and its mask (a kernel type)."""
