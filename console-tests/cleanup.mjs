// Deletes the queues and exchanges of one AMQP prefix (the test's own), as the processor
// declares them: <prefix>.processor, <prefix>.dead, <prefix>.delay.*, exchanges <prefix>
// and <prefix>.dead. Usage: node cleanup.mjs <amqp-url> <prefix>
import amqp from "amqplib";

const [url, prefix] = process.argv.slice(2);
if (!url || !prefix || !prefix.startsWith("console.")) {
  console.error("usage: node cleanup.mjs <amqp-url> console.<tag>");
  process.exit(2);
}
const delays = ["1s", "5s", "30s", "2m", "10m", "1h", "6h"];
const queues = [`${prefix}.processor`, `${prefix}.dead`, ...delays.map((d) => `${prefix}.delay.${d}`)];
const connection = await amqp.connect(url);
for (const queue of queues) {
  // A deletion of a missing queue closes the channel: one channel per name.
  const channel = await connection.createChannel();
  channel.on("error", () => {});
  await channel.deleteQueue(queue).catch(() => {});
  await channel.close().catch(() => {});
}
for (const exchange of [prefix, `${prefix}.dead`]) {
  const channel = await connection.createChannel();
  channel.on("error", () => {});
  await channel.deleteExchange(exchange).catch(() => {});
  await channel.close().catch(() => {});
}
await connection.close();
