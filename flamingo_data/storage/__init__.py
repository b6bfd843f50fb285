"""Local and remote paths, input specs, atomic files, the shard writer and reader."""
