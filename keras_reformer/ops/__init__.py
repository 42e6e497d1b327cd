"""Pure math shared by the layers (hashing, sort/chunk, logsumexp combine)."""
