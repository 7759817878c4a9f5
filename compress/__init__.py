"""Layer sparsity allocation (ECoFLaP, OWL), Wanda / N:M pruning, checkpoint writing."""
