"""Weight quantization: AWQ (activation-aware scale search + clipping) and plain RTN."""
