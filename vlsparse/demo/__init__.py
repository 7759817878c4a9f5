"""The embedded demo VLM: scene generator, tokenizer, processor, weights."""
