"""The built-in demo: a synthetic arithmetic reasoning task, its tokenizer, a teacher the project trained."""
