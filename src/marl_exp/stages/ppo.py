"""Stage 3, PPO on the multi-adapter model: not implemented yet (see the PPO issue)."""


def run(cfg, run_dir, tracker, sft_model: str, reward_adapter: str) -> dict:
    raise NotImplementedError(
        "stage=ppo is a placeholder until the multi-adapter PPO lands; run stage=sft or stage=reward")
