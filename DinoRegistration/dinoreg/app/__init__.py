"""One registration from files to files: input checks, the pipeline, the output folder, batches."""
