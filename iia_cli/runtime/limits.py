"""Hard limits that every layer checks against (the config, seed parsing, sampling), kept below them all."""

MAX_NFE = 10_000  # denoiser calls per image: beyond this a grid only costs memory and time
SEED_LIMIT = 2**63  # seeds are int64 (torch.Generator.manual_seed): 0 <= seed < 2^63
MAX_SEEDS = 10_000_000  # images per command: far beyond any FID protocol (EDM: 3 x 50,000)
