"""GPU paths of the student step, without Ray: bf16 autocast forward with frames, the distillation
terms (logit KL + CKA) and backward, on the CNN and, where peft is installed, a LoRA wav2vec2.

    python -m benchmarks.gpu_paths [--device cuda] [--steps 20]

Prints one row per model: step time with and without the distillation terms, and whether the
LoRA adapter round trip reproduces the predictions exactly on the device.
"""
import argparse
import os
import tempfile
import time

import torch


def tiny_wav2vec2(directory):
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification
    cfg = Wav2Vec2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                         num_labels=4, classifier_proj_size=128, final_dropout=0.1,
                         id2label={0: "neutral", 1: "happy", 2: "angry", 3: "sad"},
                         label2id={"neutral": 0, "happy": 1, "angry": 2, "sad": 3})
    torch.manual_seed(0)
    Wav2Vec2ForSequenceClassification(cfg).save_pretrained(directory)
    return directory


def step_time(model, teacher, wav, lengths, device, steps, distill):
    from mifuse_ray.train.distill import distill_terms
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    target = torch.randint(0, 4, (wav.shape[0],), device=device)
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, frames, mask = model(wav, lengths, return_frames=True)
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
            if distill:
                with torch.no_grad():
                    t_logits, t_frames, t_mask = teacher(wav, lengths, return_frames=True)
                for term in distill_terms(logits, frames, mask, t_logits, t_frames, t_mask, 0.5, 2.0, 0.5).values():
                    loss = loss + term
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
        assert torch.isfinite(loss), "non-finite loss"
    return sum(times) / len(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    device = torch.device(args.device)
    from mifuse_ray.models.base import load_model
    from mifuse_ray.models.cnn import LogMelCNN
    wav = 0.1 * torch.randn(args.batch, 48000, device=device)
    lengths = torch.full((args.batch,), 48000, device=device)
    rows = []
    cnn, cnn_teacher = LogMelCNN().to(device).train(), LogMelCNN().to(device).eval()
    rows.append(("LogMelCNN", step_time(cnn, cnn_teacher, wav, lengths, device, args.steps, False),
                 step_time(cnn, cnn_teacher, wav, lengths, device, args.steps, True), "n/a"))
    try:
        import peft  # noqa: F401

        from mifuse_ray.models.lora import apply_lora, trainable_fraction
        with tempfile.TemporaryDirectory() as tmp:
            base_dir = tiny_wav2vec2(os.path.join(tmp, "base"))
            student = apply_lora(load_model(base_dir), base_dir, 8, 16, ["q_proj", "v_proj"]).to(device)
            teacher = load_model(base_dir).to(device).eval()
            plain = step_time(student, teacher, wav, lengths, device, args.steps, False)
            distilled = step_time(student, teacher, wav, lengths, device, args.steps, True)
            student.eval()
            with torch.no_grad():
                want = student(wav, lengths)
            student.save(os.path.join(tmp, "adapter"))
            again = load_model(os.path.join(tmp, "adapter")).to(device).eval()
            with torch.no_grad():
                exact = torch.equal(again(wav, lengths), want)
            trainable, total = trainable_fraction(student)
            rows.append((f"wav2vec2 4L LoRA r8 ({trainable / total:.1%} trainable)", plain, distilled,
                         "exact" if exact else "DIFFERS"))
    except ImportError as exc:
        rows.append((f"LoRA wav2vec2 skipped ({exc.name} not installed)", float("nan"), float("nan"), "-"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nStudent step on {name}, batch {args.batch} × 3 s, bf16 autocast on CUDA, torch {torch.__version__}\n")
    print("| model | step ms | step ms with KL + CKA | distill overhead | adapter round trip |")
    print("|---|---|---|---|---|")
    for model, plain, distilled, exact in rows:
        print(f"| {model} | {plain * 1e3:.1f} | {distilled * 1e3:.1f} | {distilled / plain:.2f}x | {exact} |")


if __name__ == "__main__":
    main()
