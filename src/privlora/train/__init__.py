"""Training: one loop for every Task and every objective (plain, DP, MP, SMP)."""
