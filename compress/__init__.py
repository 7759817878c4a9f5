"""Layer sparsity allocation (ECoFLaP, OWL), Wanda / N:M pruning, checkpoint writing."""

if __name__ != "vlsparse.compress":  # imported as a bare ``compress`` from the repository root: see vlsparse/toplevel.py
    from vlsparse.toplevel import hand_over

    hand_over(__name__, __file__)
