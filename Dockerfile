FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY service ./service
COPY learners ./learners
COPY migrations ./migrations
# The lock pins every version the tests ran with (`make lock`); -c installs only the runtime part.
RUN pip install --no-cache-dir -c requirements.lock ".[server]"
ENV DLOOP_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
# docker-compose.yml runs this image as `dloop serve`, `dloop join`, `dloop learn` and
# `dloop migrate`; alone it is the embedded loop.
CMD ["dloop", "up", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
