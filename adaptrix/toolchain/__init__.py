"""The compiler core: IR, binders, frontends, checkpoint reader, pipeline."""
