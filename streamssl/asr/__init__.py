"""Speech recognition on top of the pretrained encoder: tokenizer, CTC, SpecAugment, metrics, recogniser, probe."""
