"""What reads shards to judge them: validate, inspect, preview."""
