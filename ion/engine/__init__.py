"""The training engine shared by ION and the RPN: a multi-phase SGD loop with
momentum kept across phases, exact resume from checkpoints, and gradient
exchange across workers (Sec. 4.1, Appendix)."""
