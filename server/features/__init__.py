"""LSP features: thin handlers that delegate to one service each."""
