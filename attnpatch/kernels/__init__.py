"""attnpatch's own attention kernels (imported lazily; nothing is loaded here)."""
