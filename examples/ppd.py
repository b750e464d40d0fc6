"""Fine-tune a Stable Diffusion LoRA with PPD: Diffusion-DPO over the pairs of many users, conditioned on user embeddings.

    accelerate launch examples/ppd.py                    # bundled digits model, bundled pairs relabelled for 4 simulated users
    accelerate launch examples/ppd.py --ppd_context_pairs 4 --ppd_num_tokens 4 --loss_type sigmoid
    accelerate launch examples/ppd.py --dataset my/pairs_with_user_id --ppd_embedding_provider me/my-vlm-user-provider \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --beta 5000 --train_learning_rate 1e-4 --mixed_precision bf16

Every `PPDConfig` field is a flag (`--help` lists them) and can come from a YAML file given with `--config`. The dataset needs a
`user_id` (or `annotator_id`) column; without `--dataset` the bundled pairs are relabelled for the simulated users 0-3 of
trl_gfn.data.personalized (users 4-5 are kept for evaluation as unseen users). See docs/ppd.md.
"""

from trl_gfn import PPDConfig, PPDTrainer
from trl_gfn.cli import run_preference

if __name__ == "__main__":
    run_preference(config_class=PPDConfig, trainer_class=PPDTrainer, personalized=True)
