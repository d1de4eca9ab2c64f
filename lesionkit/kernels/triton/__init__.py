"""Triton kernels of lesionkit's ops, registered with torch.library.triton_op so that
torch.compile sees them. Imported lazily: importing triton is slow and needs it installed."""
