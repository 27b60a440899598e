"""The HF engine core shared by HFCudaEngine and CPUEngine: loader, runner, scheduler, detok."""
