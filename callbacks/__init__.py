"""Lightning callbacks that gigagpt adds."""
