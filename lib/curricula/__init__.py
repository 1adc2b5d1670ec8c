"""Curricula over skill difficulty (issue 18): teachers that pick the next training task from a
difficulty space (Random, easy-to-hard, ALP-GMM, oracle), Auto-CEI's expert iteration with an
"I don't know" reward, and Skill-it's online skill mixture."""
