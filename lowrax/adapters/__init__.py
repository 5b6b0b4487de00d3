"""Adapter methods: the node interface (`node`), the registry (`registry`), the shared
targeting rules (`targets`), the tree functions (`tree`), the generic `wrap`, and one
module (or folder, for a family) per method. `catalog` imports the built-in methods,
which registers them."""
