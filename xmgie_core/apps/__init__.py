"""Applications above the hosts: the command line (`python -m xmgie_core`), the headless whole edit, running bundled
workflows on a ComfyUI server, and the region predictor's data builder."""
