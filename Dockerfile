FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY learners ./learners
COPY migrations ./migrations
RUN pip install --no-cache-dir .
ENV DLOOP_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["dloop", "up", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
