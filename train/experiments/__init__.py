"""The seeds' experiments as pipelines of library calls.

Each stage writes a checkpoint (an HF model directory) or a JSON file that a later stage, or a
person, can read without the code; rerunning a pipeline on the same output directory skips the
stages whose output exists and resumes an interrupted training stage from its checkpoint.
"""
