"""What the commands do, without click: build a run from a config, train, evaluate, predict, bench and
plot. :mod:`dptrain.cli` parses the command line and calls these."""
