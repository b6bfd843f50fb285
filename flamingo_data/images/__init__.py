"""The image stage: sniff, caps, keep or convert, scaled decode, resize, JPEG encode."""
