"""Fidelity evaluation on a real model: held-out data (:mod:`.data`), teacher-forced sparse
decoding in one forward (:mod:`.onepass`) and its metrics (:mod:`.fidelity`)."""
