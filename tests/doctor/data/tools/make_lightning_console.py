"""Writes lightning_console_{healthy,spiky}.log: the console of a real Lightning run (TQDMProgressBar, stdout and
stderr to a file), a tiny regression for 4 epochs of 40 steps; in the spiky one the batch of global step 140 is
scaled ×30 (one bad batch: the loss jumps ~60× at the bar's count 141). Run from the repository root:
`OMP_NUM_THREADS=1 python tests/doctor/data/tools/make_lightning_console.py` (Lightning 2.6.6 wrote the files here;
the site-packages path in its warning line is shortened)."""

import re
import subprocess
import sys
from pathlib import Path

RUN = """
import sys, torch, lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
spiky = sys.argv[1] == "spiky"
X = torch.randn(40 * 128, 8)
Y = X @ torch.randn(8, 1) + 0.1 * torch.randn(40 * 128, 1)
class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    def training_step(self, batch, i):
        x, y = batch
        if spiky and self.global_step == 140:
            x = x * 30
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)
trainer = L.Trainer(max_epochs=4, callbacks=[TQDMProgressBar()], logger=False, enable_checkpointing=False,
                    enable_model_summary=False, accelerator="cpu", devices=1)
trainer.fit(M(), DataLoader(TensorDataset(X, Y), batch_size=128))
"""

if __name__ == "__main__":
    for kind in ("healthy", "spiky"):
        done = subprocess.run([sys.executable, "-c", RUN, kind], capture_output=True, text=True, check=True)
        text = re.sub(r"\S*/site-packages/", ".../site-packages/", done.stdout + done.stderr)
        (Path(__file__).parent / f"lightning_console_{kind}.log").write_text(text)
