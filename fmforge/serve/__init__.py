"""`fmforge serve`: one base model and many LoRA specialists behind OpenAI's API, with a chat page."""
