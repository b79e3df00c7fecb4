"""Learning side of dloop: Vowpal Wabbit learners and the workers that feed them."""
