"""One module per group of figures; each has run(ctx)."""
