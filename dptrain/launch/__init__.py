"""Starting ranks: the mpiexec argv of ``dptrain launch -n``, and Slurm/PBS batch scripts made from the
templates shipped in ``templates/`` (the repository's top-level ``launch/`` is a link to them)."""
