"""Data: read records, render prompt templates, tokenize with response-only labels, batch."""
