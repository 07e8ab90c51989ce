"""Models: students and teachers from timm and the attention choice (factory), weights in and out
(fetch, folders, hf_keys, export), predictions on image files (predict)."""
