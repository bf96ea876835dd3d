"""The RunPod provider: endpoints on RunPod Serverless, provisioned as runpod-flash does."""
