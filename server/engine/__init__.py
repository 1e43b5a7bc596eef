"""Engine core: scheduling and KV block management. Pure Python, never imports torch."""
