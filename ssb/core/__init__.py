"""The floor every stage stands on: files, the run-directory layout, model/tokenizer loading, prompts, grading,
data. Nothing here imports a stage, an engine or the store (tests/test_architecture.py checks it)."""
