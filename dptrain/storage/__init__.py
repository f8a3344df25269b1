"""What dptrain keeps on disk: checkpoints (verified on load), the run folder and which checkpoint
``--resume auto`` takes, and files written atomically."""
