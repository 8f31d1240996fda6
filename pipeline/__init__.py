"""The library: everything a stage needs. No CLI code; no printing beyond progress hooks."""
