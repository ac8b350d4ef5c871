"""Online RL fine-tuning against the reward service (torch side; DESIGN.md 2.5, issue 12).

A small text-to-image diffusion model of the shapes world (`generator`), a supervised
ground-truth judge (`judge`), DDPO and reward-weighted likelihood trainers (`trainers`) that
talk to the service only through the client (`reward_client`), and their commands (`commands`).
"""
