"""The pure core: the pipeline spec and its step graph, the step and run machines
(`transitions`), events and bus messages, fold and decide. No I/O, no clock, no unseeded
randomness: the services pass `now` and store what is decided."""
