"""genq API: FastAPI app (native jobs, SSE, OpenAI-compatible endpoints). Never imports vllm."""
